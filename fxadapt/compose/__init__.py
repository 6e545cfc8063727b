"""Composition: blocks (Stack, Fuse, Split, BatchSplit, Parallel, Average, Sum), AdapterFusion, parameter averaging."""
