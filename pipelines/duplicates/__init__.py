"""Near-duplicate images across products of a published index version
(`catalog-search duplicates`): the Beam job (job.py), its worker steps (pairs.py: nearest
neighbours of each shard's vectors against the whole index, the pixel check), the groups
(groups.py: union-find, the duplicates table, the counts) and the HTML report (report.py).
"""
