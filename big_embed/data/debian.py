"""Finds files of Debian packages that hold raw dataset sources, installing the package if allowed.

Installing needs root and `apt-get`; otherwise a missing package raises `DataError` whose message is
the one command to run.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

from big_embed.data.errors import DataError


def _installed_files(package: str) -> list[pathlib.Path] | None:
  """Returns the files `dpkg -L package` lists, or None if the package is not installed.

  A package removed but not purged still has a dpkg entry (its config files), so the status must be
  "install ok installed", not just known to dpkg.
  """
  if shutil.which("dpkg") is None:
    return None
  status = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True,
                          check=False)
  if status.returncode != 0 or status.stdout.strip() != "install ok installed":
    return None
  proc = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    return None
  return [pathlib.Path(line) for line in proc.stdout.splitlines() if line.strip()]


def _apt_install(package: str) -> bool:
  """Runs `apt-get install -y package` (with `apt-get update` on failure); True on success."""
  cmd = ["apt-get", "install", "-y", package]
  print(f"Installing Debian package {package}: {' '.join(cmd)}", flush=True)
  env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
  if subprocess.run(cmd, env=env, check=False).returncode == 0:
    return True
  print("Install failed; running: apt-get update", flush=True)
  subprocess.run(["apt-get", "update"], env=env, check=False)
  print(f"Retrying: {' '.join(cmd)}", flush=True)
  return subprocess.run(cmd, env=env, check=False).returncode == 0


def ensure_package(package: str) -> list[pathlib.Path]:
  """Makes sure Debian `package` is installed; returns the paths it installed.

  Raises:
    DataError: the package is missing and cannot be installed here; the message is the command.
  """
  files = _installed_files(package)
  if files is not None:
    return files
  can_install = hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get")
  if can_install and _apt_install(package):
    files = _installed_files(package)
    if files is not None:
      return files
  raise DataError(f"Debian package {package} is missing; install it with: "
                  f"sudo apt-get install -y {package}")


def package_file(package: str, suffix: str) -> pathlib.Path:
  """Returns the installed file of `package` whose path ends with `suffix` (installing if needed).

  Raises:
    DataError: the package cannot be installed, or holds no existing file ending with `suffix`.
  """
  for path in ensure_package(package):
    if path.as_posix().endswith(suffix) and path.is_file():
      return path
  raise DataError(f"Debian package {package} has no file ending with {suffix!r}; reinstall it with: "
                  f"sudo apt-get install --reinstall -y {package}")
