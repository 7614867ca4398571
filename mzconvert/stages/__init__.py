"""The stages of a build, each a function from input artifact paths and a recipe section to output paths."""
