-- Deprecated forwarder: `lbatch.report` is internal since 1.0, now `lbatch.cmd.report`.
-- The name was announced in CHANGELOG.md, so it forwards until 2.0, where it is removed.
return require "lbatch.cmd.report"
