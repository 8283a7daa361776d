"""Protocol adapters: each translates one wire protocol to the shard's sessions."""
