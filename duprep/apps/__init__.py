"""Business apps that ship with duprep: ``records`` (the seed's "operate the database"), ``echo``, and
``conformance`` (every kind of answer, for testing clients: docs/protocol.md 1.14)."""
