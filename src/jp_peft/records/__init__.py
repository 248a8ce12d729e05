"""Records with one owner each: the run-directory layout, stage metrics, export records, fingerprints, progress rows."""
