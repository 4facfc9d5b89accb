"""Storage tiers behind one key layout: local disk, S3, and the S3 write-through pair."""
