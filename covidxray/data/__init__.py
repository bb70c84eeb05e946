"""Sources as downloaded -> checked images -> patient-grouped split -> a dataset folder."""
