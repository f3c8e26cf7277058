-- lbatch's version, in one place (the rockspec's must agree: spec/conformance/habits_spec.lua).
return "1.0.0"
