"""The scanner's filters. Each module exposes `check(ctx: ScanContext) -> list[Verdict]`;
`services.scanner.core` runs them in the order `[scanner].filters` names."""
