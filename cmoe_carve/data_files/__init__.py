"""Text shipped with cmoe-carve so that the built-in default carves offline.

`wikitext2_valid_excerpt.txt` is the first 123,759 bytes of WikiText-2 raw `wiki.valid.raw` (its
first seven articles, cut at an article boundary); see ATTRIBUTION.md for the source and licence.
It holds 30,500 SmolLM2 tokens when read as WikiText rows joined with "\\n\\n": enough for the
default 8 calibration windows of 2,048 tokens (16,384).
"""

WIKITEXT2_EXCERPT = "wikitext2_valid_excerpt.txt"
