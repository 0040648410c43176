"""Built-in backbone variants: one file per idea, each ending with ``VARIANT = <class>``."""
