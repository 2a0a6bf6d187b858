"""The names of the closed-loop forecast sources: one definition, light to import (the command line reads it).

``sources`` builds the source of each name; the runner, the regression gate, the demo and the command line's
``--forecast`` choices read the names from here.
"""

MODEL = "model"
"""The world model of a checkpoint forecasting from the rendered sensors and the ego's poses alone, its agents
tracked from its own detections (``ModelSource``)."""
MODEL_ANNOTATED = "model_annotated"
"""The same model given the true agents within the annotation range and their pasts (``ModelSource`` with
annotated agents): the prediction-challenge protocol, perfect perception."""
MODEL_SOURCES = (MODEL, MODEL_ANNOTATED)
"""The sources that need a checkpoint."""
CONSTANT_VELOCITY = "cv"
"""The true boxes of now moved at constant velocity (``ConstantVelocitySource``); ``cv`` is what users type."""
ORACLE = "oracle"
"""The simulator's own future (``OracleSource``)."""
NONE = "none"
"""No forecast (``NoForecast``)."""
FORECASTS = (MODEL, MODEL_ANNOTATED, CONSTANT_VELOCITY, ORACLE, NONE)
"""The forecast sources' names: the one definition that the runner, the regression gate, the demo and the command
line's ``--forecast`` choices use, and the ``forecast`` that ``metrics.json`` and regression baselines record."""
