-- lbatch's version, in one place (the rockspec's must agree: spec/habits_spec.lua).
return "0.2.0"
