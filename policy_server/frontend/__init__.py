"""The streamlit demo's logic (``frontend.py`` at the repository root is only its layout).

``gateway_api`` talks to a running server over HTTP, ``forms`` turns the public schema into form
fields and form values into request bodies, ``charts`` turns answers into chart data, and
``example`` starts the bundled example server. Nothing here imports streamlit.
"""
