"""The run report: `write_report(cfg, run_dir)` -> `report/report.md` + plots + throughput.json.

`collect` reads the run directory (tolerating absent pieces), `plots` draws PNGs, `write`
assembles the markdown. `selfreward report --run-dir DIR` is the command line entry.
"""

from megatron_selfreward.report.write import PAPER_TABLE4, load_run_config, write_report

__all__ = ["PAPER_TABLE4", "load_run_config", "write_report"]
