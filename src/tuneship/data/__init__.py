"""The data stage: read sources, convert every record to a `Conversation`, audit, split."""
