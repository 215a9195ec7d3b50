"""Memory families that plug into the block registry (memjax/models/registry.py): pkm (product-key memory)."""
