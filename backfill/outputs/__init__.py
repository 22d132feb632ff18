"""What a run leaves behind: its folder of results, rejects and summary, and the report built from them."""
