"""Diagnosing: model facts (:mod:`.model_facts`), the run's history of measured steps
(:mod:`.run_history`), and the checks (:mod:`.checks`, :mod:`.flow_checks`) that turn them into
findings with their evidence and fixes (:mod:`.findings`); the first measured step's wiring report
(:mod:`.first_step`). Pure Python over floats and names, apart from the model facts' one look at
the module tree; no Lightning."""
