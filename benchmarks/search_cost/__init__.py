"""What the search costs: the first run against a run with the ranking present."""
