"""The client host: one daemon carries the gateway link for many local processes.

The seed's client side, rebuilt: ``tcp_c`` (with ``tcp_c1``) held the links
to the server and served the host's business processes (``c_process``)
through two message queues.  Here:

* :mod:`duprep.clienthost.daemon` -- ``duprep client-daemon``: holds the
  link, serves local processes through POSIX queues.
* :class:`duprep.local.Client` -- what a local process uses; the same
  methods as :class:`duprep.Client`.

One module per job: ``protocol`` (queue messages), ``procid`` (pid + start
time, pidfds), ``instance`` (lock, info, crash cleanup), ``endpoints``
(local processes and their reply queues), ``routes`` (msgid mapping,
orphans), ``dial`` (direct and callback dialling), ``link`` (the gateway
connection and reconnects), ``control`` (status socket), ``config``,
``launch`` (start a daemon as a child, for tests and tools).
See docs/clienthost.md.
"""

from __future__ import annotations

__all__: list[str] = []
