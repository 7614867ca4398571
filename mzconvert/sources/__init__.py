"""Where models and images come from: fetch (cache, mirrors, origin), PyPI, archives, image sets, inspect and init."""
