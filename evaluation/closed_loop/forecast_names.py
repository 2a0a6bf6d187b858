"""The names of the closed-loop forecast sources: one definition, light to import (the command line reads it).

``sources`` builds the source of each name; the runner, the regression gate, the demo and the command line's
``--forecast`` choices read the names from here.
"""

MODEL = "model"
"""The world model of a checkpoint (``ModelSource``)."""
CONSTANT_VELOCITY = "cv"
"""The true boxes of now moved at constant velocity (``ConstantVelocitySource``); ``cv`` is what users type."""
ORACLE = "oracle"
"""The simulator's own future (``OracleSource``)."""
NONE = "none"
"""No forecast (``NoForecast``)."""
FORECASTS = (MODEL, CONSTANT_VELOCITY, ORACLE, NONE)
"""The forecast sources' names: the one definition that the runner, the regression gate, the demo and the command
line's ``--forecast`` choices use, and the ``forecast`` that ``metrics.json`` and regression baselines record."""
