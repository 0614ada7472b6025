"""Reports: load run directories into a tidy frame, paired statistics, claim tests, tables
and figures."""
