-- Deprecated forwarder: `lbatch.estimate` is internal since 1.0, now `lbatch.impl.formats.estimate`.
-- The name was announced in CHANGELOG.md, so it forwards until 2.0, where it is removed.
return require "lbatch.impl.formats.estimate"
