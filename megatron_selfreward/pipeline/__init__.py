"""The self-rewarding loop: the stage schedule and the executors that run it."""
