"""The `vlpcache` command (pyproject's [project.scripts], and `python -m vlpcache`)."""

from vlpcache.interrupts import quiet_while_importing


def main() -> None:
    with quiet_while_importing():
        from vlpcache.cli import main as command_table
    command_table()


if __name__ == "__main__":
    main()
