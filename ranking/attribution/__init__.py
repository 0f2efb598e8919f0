"""Captum feature attribution of a trained ranking model over feature groups (the library behind
``python -m ranking.importance``).

=============== ==========================================================================
module          what it holds
=============== ==========================================================================
``interaction`` :class:`~ranking.attribution.interaction.InteractionInputModel`: the trained
                model fed with the looked-up vectors, embeddings and cosines, so that each
                can be permuted on its own; :func:`~ranking.attribution.interaction.embed_batch`
``groups``      the feature groups and the rows under study as grouped model inputs, with
                their Captum masks and baselines
``methods``     Captum permutation, ablation and integrated gradients over the groups
``report``      the ``importance.json`` content, the methods' agreement, the markdown table
                and the plot
=============== ==========================================================================
"""
