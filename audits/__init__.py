"""audits: Spectral Relevance Analysis on plain arrays (numpy/scipy/scikit-learn; never torch).

Heatmaps from any source go in; clusters of explanation strategies, their eigengap analysis and Clever-Hans
scores come out. The SpRAy estimator lands here with issue 5.
"""
