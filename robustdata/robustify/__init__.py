"""Dataset robustification (Ilyas et al. 2019): D_R, D_NR, D_rand, D_det builders and resumable shard-by-shard builds."""
