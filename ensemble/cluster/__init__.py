"""What N worker processes of one gateway share: the hub that orders their shared state, each
worker's link to it, and the admission count in shared memory. Generic: it knows messages and
topics, not what the gateway keeps in them (``ensemble.worker`` does)."""
