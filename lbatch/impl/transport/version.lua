-- lbatch's version, in one place (the rockspec's must agree: spec/conformance/habits_spec.lua).
return "0.2.0"
