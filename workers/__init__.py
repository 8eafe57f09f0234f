"""RQ job code: fetch a new mail's headers, classify it, match it to a send, act once."""
