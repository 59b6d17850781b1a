"""The field testers' live page (one HTML file, inline script and style), served by :mod:`hems_firmware.web`."""
