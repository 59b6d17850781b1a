"""``mhp-stack``: the whole Market Hub Platform on one machine."""
