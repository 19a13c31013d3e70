"""Fleet tools that speak the real device protocol from outside the control plane.

``simulator.py`` runs thousands of simulated agents in one asyncio process against a real
server (enroll, check in with ETags, walk install phases, post telemetry, go offline), so a
rollout or a scale target can be measured through the API as a fleet would exercise it.
``canned.py`` is the cheapest responder that answers the same routes, so the simulator's own
ceiling can be printed beside every result. ``config.py`` holds the settings, ``devices.py``
a device's state and wire bodies, ``http.py`` the keep-alive client, ``report.py`` the counts.
Imports protocol models only, never the server.
"""
