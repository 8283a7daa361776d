"""End-to-end load runner (``broker bench``, issue 4).

* ``stats``   pure parts: percentiles, offset tracking, result records, tables, ratios
* ``worker``  receiver (picows clients) and publisher (keep-alive HTTP) processes
* ``targets`` the servers under load and their process tree's CPU/RSS
* ``runner``  one workload against one target
* ``report``  a whole invocation: targets x workloads, table, ratios, JSON
* ``cli``     the click command
"""
from .stats import RESULT_FIELDS, percentiles  # noqa: F401
