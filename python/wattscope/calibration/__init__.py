"""Sensor calibration: measure how a GPU's power sensor responds to a known load, and keep what was learned.

``wattscope calibrate`` drives a GPU-timed square-wave load (load.py), records every power source while it runs
(runner.py), fits a boxcar and a first-order low-pass response, each with a pure delay (fit.py), and saves a
sensor profile (wattscope.sensor_profile) that PowerMeter loads. protocol.py turns a profile into window lengths
and phase offsets for harnesses and the model sweep.
"""
