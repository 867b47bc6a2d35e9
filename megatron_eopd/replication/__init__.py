"""The replication study on the embedded synthetic task (``make replicate``, ``tools/replicate.py``).

OPD, EOPD and FKL-only students distilled from one tiny teacher, several seeds each, one budget;
the report (``report.md``, ``summary.json``, PNG plots) is computed from the runs' own files.

* :mod:`.study`: settings, the three arms, running and evaluating each (method, seed) run;
* :mod:`.results`: reading the files back, aggregation over seeds, the paper's three directions;
* :mod:`.report`: plots and Markdown.
"""

from megatron_eopd.replication.report import write_report
from megatron_eopd.replication.study import METHODS, StudyConfig, run_study

__all__ = ["METHODS", "StudyConfig", "run_study", "write_report"]
