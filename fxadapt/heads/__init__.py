"""Prediction heads: AdapterHub's flexible heads (attached to the graph by ``passes/heads.py``) and static HF heads.

``types`` maps AdapterHub's head types to their modules (``classification``, ``token``,
``language_modeling``), ``attach`` puts the active head into a rewritten graph, ``mixin`` is the API on
``AdaptedModel`` (``add_classification_head``, ``active_head``, ...), ``static`` finds the task head of a
model class such as ``BertForSequenceClassification``, ``files`` saves and loads heads.
"""
