"""prefrank: exact, fast log-probability scoring of preference data, and the ranking analysis of
Chen et al. 2024, "Preference Learning Algorithms Do Not Learn Preference Rankings"."""
__version__ = "0.1.0"
