"""Migratable applications built on sessmob.appkit (`sessmob app NAME ...`)."""
