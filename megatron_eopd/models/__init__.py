"""Model families built on Megatron-Core.  Each family owns its HF <-> Megatron mapping table."""
