"""The launcher's parts: log watching, process supervision (crash recovery, shutdown), drain signalling."""
