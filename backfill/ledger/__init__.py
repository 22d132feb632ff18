"""The ledger: the durable record of every attempt and outcome, keyed by user_id, that resuming trusts."""
