"""Configs of score_flow (Song, Durkan, Murray & Ermon 2021, maximum-likelihood training), at its paths."""
