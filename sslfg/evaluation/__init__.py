"""The frozen-feature evaluations: the run every eval command shares (run), features and their cache (features),
kNN and retrieval (knn), the linear probe (linear), where a backbone looks (localisation), the choice made on
validation data (selection), embeddings written to disk (embed), and the evaluations during pretraining (online)."""
