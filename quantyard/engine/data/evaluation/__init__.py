"""The default evaluation text (evaluation.txt; README.md says what it holds and its licences)."""
