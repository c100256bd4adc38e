"""Developer and CI tools that sit beside the pipeline package, not inside it."""
