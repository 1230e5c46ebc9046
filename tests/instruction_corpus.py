"""Deterministic, realistic-looking instructions for the ROUGE-L filter's tests and benchmark.

Instructions are drawn from templates x topics x verbs x constraints (5 to ~40 words), and a
share of them are paraphrases of an earlier one (synonym swaps, inserted or dropped words, a
changed number or topic, an added constraint), so that many pairs land near Self-Instruct's
ROUGE-L 0.7 threshold, on both sides of it. A few topics carry non-ASCII text (accents, curly
quotes, ligatures, the Kelvin sign, dotted capital I) to exercise the tokenizer.
"""

from __future__ import annotations

import random

TOPICS = [
    "photosynthesis", "the water cycle", "black holes", "compound interest", "the French Revolution",
    "machine learning", "climate change", "the immune system", "plate tectonics", "supply and demand",
    "the stock market", "quantum computing", "renewable energy", "the Roman Empire", "DNA replication",
    "blockchain technology", "the theory of relativity", "inflation", "volcanoes", "the human heart",
    "electric cars", "social media", "the printing press", "sleep hygiene", "time management",
    "public speaking", "remote work", "urban gardening", "the Cold War", "vaccines", "recycling",
    "coral reefs", "the Industrial Revolution", "neural networks", "the Silk Road", "ocean tides",
    "credit scores", "meditation", "a balanced diet", "the greenhouse effect", "solar panels",
    "3D printing", "the Great Depression", "bees and pollination", "the Olympic Games", "jazz music",
    "the Renaissance", "cryptography", "earthquakes", "the moon landing", "antibiotics",
    "café culture in Paris", "the naïve Bayes classifier", "writing a résumé", "Zürich’s old town",
    "the ﬁnancial crisis of 2008", "temperatures in \u212aelvin", "\u0130stanbul’s history",
    "Straße names in Berlin", "the piñata tradition", "Tōkyō’s subway — a guide",
]
NOUNS = [
    "bicycle", "volcano", "vaccine", "budget", "garden", "river", "robot", "library", "password",
    "bridge", "recipe", "telescope", "battery", "forest", "museum", "startup", "satellite", "tax",
    "kitchen", "guitar", "marathon", "election", "hospital", "glacier", "algorithm", "spreadsheet",
    "vacation", "wedding", "festival", "camera", "microscope", "newspaper", "podcast", "bakery",
    "classroom", "highway", "airport", "submarine", "castle", "desert", "painting", "sculpture",
    "orchestra", "smartphone", "database", "vineyard", "lighthouse", "farm", "factory", "railway",
    "insurance", "mortgage", "pension", "contract", "lawsuit", "protein", "enzyme", "virus", "planet",
    "comet", "tornado", "drought", "harbor", "tunnel", "skyscraper", "compiler", "browser", "router",
    "wallet", "recipe book", "chess opening", "poem", "novel", "sonnet", "symphony", "dance", "garden shed",
    "beehive", "aquarium", "greenhouse", "windmill", "canal", "monastery", "market", "bank", "school",
    "zoo", "parliament", "constitution", "currency", "vitamin", "allergy", "muscle", "brain", "lung",
]
ADJECTIVES = [
    "electric", "ancient", "small", "public", "digital", "local", "healthy", "modern", "rural",
    "urban", "cheap", "expensive", "renewable", "historic", "portable", "quiet", "crowded", "remote",
    "sustainable", "traditional", "experimental", "fragile", "automated", "seasonal", "nuclear",
    "medieval", "tropical", "frozen", "wireless", "handmade", "open-source", "private", "national",
]
QUALIFIERS = ["in medieval Europe", "for small businesses", "in the 21st century", "during winter",
              "in developing countries", "on a tight budget", "for people with allergies", "in space",
              "under water", "in a big city", "on a farm", "at a hospital", "in the Arctic", "in schools",
              "for online shops", "in ancient Egypt", "after a storm", "in the desert", "for musicians",
              "in professional football", "at night", "in old houses", "for teenagers", "in Japan",
              "in the rainforest", "for air travel", "on social networks", "in a small village"]
AUDIENCES = ["a five-year-old", "a high school student", "a beginner", "an expert", "a busy parent",
             "a retiree", "a software engineer", "a new employee", "a tourist", "a small business owner",
             "my grandmother", "a nurse", "a farmer", "a history teacher", "an investor", "a child",
             "a skeptical friend", "a journalist", "a first-year student", "the city council"]
FORMS = ["poem", "short story", "haiku", "limerick", "blog post", "tweet", "speech", "song",
         "product description", "news headline", "cover letter", "dialogue", "riddle", "essay",
         "slogan", "recipe", "letter", "review", "joke", "fable", "press release", "job advert"]
TONES = ["funny", "formal", "friendly", "persuasive", "sad", "optimistic", "sarcastic", "calm",
         "dramatic", "neutral", "enthusiastic", "polite"]
ACTIVITIES = ["studying for exams", "saving money", "learning a new language", "staying healthy",
              "running a marathon", "cooking at home", "traveling on a budget", "starting a podcast",
              "writing a novel", "training a puppy", "moving to a new city", "growing tomatoes",
              "fixing a flat tire", "planning a wedding", "negotiating a salary", "learning to swim",
              "painting a room", "reading more books", "making new friends", "quitting sugar"]
CONSTRAINTS = [
    "Use no more than {n}0 words.", "Include at least one example.", "Format the answer as a table.",
    "Explain it step by step.", "Avoid technical jargon.", "End with a question for the reader.",
    "Use bullet points.", "Write it in the second person.", "Mention one common misconception.",
    "Keep the tone {tone}.", "Cite one historical fact.", "Answer in {n} sentences.",
    "Do not use the letter e.", "Add a title.", "Make it rhyme.", "Give sources where possible.",
    "Assume the reader knows nothing about it.", "Finish with a one-line summary.",
    "Relate it to {topic}.", "Focus on {adj} {noun}s.", "Assume the reader lives {qualifier}.",
    "Mention {audience} somewhere.", "Compare it briefly with {topic}.", "Set it {qualifier}.",
]
TEMPLATES = [
    "Explain {topic} to {audience}.",
    "Describe how {topic} works in simple terms.",
    "Write a {tone} {form} about {topic}.",
    "Give me {n} tips for {activity}.",
    "What is the difference between {topic} and {topic2}?",
    "Summarize the main ideas behind {topic} in {n} sentences.",
    "List {n} common mistakes people make when {activity}.",
    "Compare {topic} with {topic2} and explain which matters more for {audience}.",
    "Write a {form} that explains {topic} to {audience}.",
    "Why is {topic} important for {audience}?",
    "Create a quiz with {n} questions about {topic}.",
    "How would you teach {topic} to {audience} in one hour?",
    "Suggest {n} creative ideas for a {form} about {activity}.",
    "What are the pros and cons of {topic}?",
    "Draft an email to {audience} about {activity}.",
    "Outline a {n}-week plan for {activity}.",
    "Rewrite this sentence to sound more {tone}: \"{topic} changed the world.\"",
    "Classify the following as either science or history: {topic}.",
    "Give an analogy that makes {topic} easy to understand for {audience}.",
    "Tell me a {tone} story about someone {activity}.",
    "I am {activity} and keep failing. What should I change?",
    "Name {n} famous people connected to {topic}.",
    "Is it true that {topic} causes {topic2}? Give a balanced answer.",
    "Design a lesson about {topic} for {audience}.",
    "Translate this phrase into French: \"{topic}\".",
    "Invent a board game based on {topic}.",
    "Predict how {topic} will change over the next {n}0 years.",
    "Argue for and against banning {topic}.",
    "My friend says {topic} is overrated. How do I respond?",
    "Write {n} interview questions for an expert on {topic}.",
    "Which {n} books would you recommend to learn about {topic}?",
    "Turn {topic} into a {tone} {form} for {audience}.",
    "What would happen if {topic} disappeared tomorrow?",
    "Plan a weekend trip that involves {activity}.",
    "Estimate the cost of {activity} and show your reasoning.",
    "Create a checklist for {activity}.",
    "Write a short biography of {name} {name2}, a {adj} inventor.",
    "Summarize the novel \"The {noun} of {name}\" for {audience}.",
    "Plan a three-day visit to {name}, a {adj} town known for its {noun}s.",
    "Write a product description for the {name} {noun}.",
]
SYNONYMS = [
    ["Explain", "Describe", "Clarify"], ["Give me", "Provide", "Share"], ["tips", "ideas", "suggestions"],
    ["simple", "plain", "easy"], ["common", "frequent", "typical"], ["important", "essential", "crucial"],
    ["Write", "Compose", "Draft"], ["Summarize", "Sum up", "Condense"], ["main", "key", "central"],
    ["story", "tale"], ["Create", "Make", "Design", "Put together"], ["Compare", "Contrast"],
    ["mistakes", "errors", "blunders"], ["What would happen", "What might happen", "Describe what happens"],
    ["Estimate", "Work out", "Guess"], ["show your reasoning", "explain each step", "justify the numbers"],
    ["Classify the following as", "Decide whether this is", "Label this as"], ["Tell me", "Write", "Share"],
    ["Argue for and against", "Debate", "Weigh the case for"], ["recommend", "suggest", "pick"],
    ["interview questions", "questions", "discussion prompts"], ["famous people", "key figures", "pioneers"],
]
OPENERS = ["", "", "", "", "Please", "Can you", "I need you to", "Quick question:", "For my class,",
           "As a helpful assistant,", "Without using jargon,", "In your own words,", "Briefly,",
           "For a newsletter,", "Here is a task:", "Imagine you are a teacher.", "Be creative:",
           "My boss asked me this:", "Using British spelling,", "Step by step,"]
FILLERS = ["please", "briefly", "in detail", "for me", "quickly", "carefully", "in plain English",
           "if possible", "with examples", "today"]


SYLLABLES = ["ka", "lo", "mir", "ven", "tas", "ro", "bel", "dun", "fi", "gar", "hel", "is", "jor", "kel",
             "lan", "mo", "nor", "pa", "quin", "ras", "sil", "tor", "ul", "vas", "wen", "xi", "yor", "zan",
             "bri", "cor", "del", "ek", "fen", "gul", "hav", "ith", "jun", "kro", "lum", "mar"]


def _name(rng: random.Random) -> str:
    """A made-up proper name (people, places, products): real instructions are full of them."""
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def _topic(rng: random.Random) -> str:
    pick = rng.random()
    if pick < 0.3:
        topic = rng.choice(TOPICS)
    elif pick < 0.45:
        topic = f"the {_name(rng)} {rng.choice(NOUNS)}"
    elif pick < 0.8:
        topic = f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}s"
    else:
        topic = f"the {rng.choice(NOUNS)}"
    return f"{topic} {rng.choice(QUALIFIERS)}" if rng.random() < 0.6 else topic


def _constraint(rng: random.Random) -> str:
    return rng.choice(CONSTRAINTS).format(n=rng.randint(2, 9), tone=rng.choice(TONES), topic=_topic(rng),
                                          adj=rng.choice(ADJECTIVES), noun=rng.choice(NOUNS),
                                          qualifier=rng.choice(QUALIFIERS), audience=rng.choice(AUDIENCES))


def _fill(rng: random.Random, template: str) -> str:
    topic, topic2 = _topic(rng), _topic(rng)
    text = template.format(topic=topic, topic2=topic2, name=_name(rng), name2=_name(rng),
                           adj=rng.choice(ADJECTIVES), noun=rng.choice(NOUNS), audience=rng.choice(AUDIENCES), form=rng.choice(FORMS),
                           tone=rng.choice(TONES), activity=rng.choice(ACTIVITIES), n=rng.randint(2, 9))
    opener = rng.choice(OPENERS)
    if opener:
        text = f"{opener} {text[0].lower()}{text[1:]}"
    for group in rng.sample(SYNONYMS, 2):  # the same template in other words
        hits = [w for w in group if w in text]
        if hits:
            text = text.replace(hits[0], rng.choice(group), 1)
    for _ in range(rng.choice([0] * 9 + [1] * 8 + [2] * 2 + [3])):  # ~5 to ~40 words
        text += " " + _constraint(rng)
    return text


def paraphrase(rng: random.Random, text: str) -> str:
    """One to four small edits of `text`: what a generator repeating itself tends to write."""
    for _ in range(rng.choice([1, 1, 2, 2, 3, 4])):
        words = text.split()
        edit = rng.randrange(6)
        if edit == 0:
            group = rng.choice(SYNONYMS)
            hits = [w for w in group if w in text]
            if hits:
                text = text.replace(hits[0], rng.choice([w for w in group if w != hits[0]]), 1)
                continue
        if edit <= 1 and len(words) > 4:
            words.insert(rng.randrange(1, len(words)), rng.choice(FILLERS))
        elif edit == 2 and len(words) > 5:
            del words[rng.randrange(1, len(words))]
        elif edit == 3:
            words = [str(rng.randint(2, 12)) if w.isdigit() else w for w in words]
            words.append(_constraint(rng))
        elif edit == 4:
            old = next((t for t in TOPICS if t in text), None)
            if old:
                text = text.replace(old, rng.choice(TOPICS), 1)
                continue
        else:
            words = [w.lower() if i and rng.random() < 0.1 else w for i, w in enumerate(words)]
            words[-1] = words[-1].rstrip(".?!") + rng.choice([".", "?", "!", ""])
        text = " ".join(words)
    return text


def synthetic_instructions(count: int, seed: int = 0, near_duplicate_share: float = 0.3) -> list[str]:
    """`count` instructions; about `near_duplicate_share` of them paraphrase an earlier one."""
    rng = random.Random(seed)
    out: list[str] = []
    for _ in range(count):
        if out and rng.random() < near_duplicate_share:
            # Recent items more often: a generator repeats what it has just seen in its shots.
            source = out[-1 - min(int(rng.expovariate(1 / 200)), len(out) - 1)]
            out.append(paraphrase(rng, source))
        else:
            out.append(_fill(rng, rng.choice(TEMPLATES)))
    return out
