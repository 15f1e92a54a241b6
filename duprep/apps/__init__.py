"""Business apps that ship with duprep: ``records`` (the seed's "operate the database") and ``echo``."""
