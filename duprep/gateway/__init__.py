"""The gateway's processes (internal: not a public API).

``acceptor`` supervises and accepts, ``receiver`` reads clients, ``sender``
writes them.  Only ``duprep.cli`` imports these modules.
"""
