"""ms-swift external plugin (``--external_plugins`` this file): registers ``--callbacks visual_region``.

swift imports this file by path while it parses its arguments, in every rank.
"""

from vr_plugin.integrations.swift import register

register()
